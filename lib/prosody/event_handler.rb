# frozen_string_literal: true

module Prosody
  # Base class for handlers. Subclass it and implement {#on_message}. Calls for different keys
  # run concurrently (as Async tasks on one thread), calls for one key one at a time, in order.
  #
  # An exception raised by a handler method marks the event failed. Whether a retry can help
  # decides what happens next (see the README's modes): {Prosody::PermanentError} and the
  # classes named with {.permanent} are permanent, {Prosody::TransientError} and the classes
  # named with {.transient} are transient, and anything else is transient.
  class EventHandler
    # Handler methods whose errors can be classified.
    CLASSIFIABLE = %i[on_message on_timer].freeze

    class << self
      # Marks exceptions of +error_classes+ (and their subclasses) raised by +method_name+ as
      # permanent: they are not retried. Usable before or after the method's +def+; inherited by
      # subclasses, which can override it.
      #
      # @param method_name [Symbol] +:on_message+ or +:on_timer+
      # @param error_classes [Array<Class>] exception classes
      # @return [void]
      def permanent(method_name, *error_classes)
        classify(:permanent, method_name, error_classes)
      end

      # Marks exceptions of +error_classes+ raised by +method_name+ as transient (retryable).
      # Everything unclassified is transient already; use this to carve an exception out of a
      # broader permanent class.
      #
      # @param method_name [Symbol] +:on_message+ or +:on_timer+
      # @param error_classes [Array<Class>] exception classes
      # @return [void]
      def transient(method_name, *error_classes)
        classify(:transient, method_name, error_classes)
      end

      # @api private
      # @return [Hash{Class => Symbol}] this class's classification of +method_name+'s errors,
      #   inherited ones included (a subclass's own entries win)
      def error_classification(method_name)
        ancestors.reverse.each_with_object({}) do |klass, table|
          own = klass.instance_variable_get(:@prosody_error_classes) if klass.is_a?(Class)
          table.merge!(own[method_name] || {}) if own
        end
      end

      # @api private
      # @return [Symbol] +:permanent+ or +:transient+ for +error+ raised by +method_name+
      def failure_kind(method_name, error)
        return :permanent if error.is_a?(PermanentError)
        return :transient if error.is_a?(TransientError)

        table = error_classification(method_name)
        error.class.ancestors.each do |ancestor|
          kind = table[ancestor]
          return kind if kind
        end
        :transient
      end

      private

      def classify(kind, method_name, error_classes)
        name = classifiable_method(kind, method_name)
        raise ArgumentError, "#{kind} :#{name} needs at least one exception class" if error_classes.empty?

        bad = error_classes.index { |klass| !exception_class?(klass) }
        raise ArgumentError, "#{kind} :#{name} expects exception classes, got #{error_classes[bad].inspect}" if bad

        @prosody_error_classes ||= {}
        table = (@prosody_error_classes[name] ||= {})
        error_classes.each { |klass| table[klass] = kind }
        nil
      end

      def exception_class?(klass)
        klass.is_a?(Class) && klass <= Exception
      end

      def classifiable_method(kind, method_name)
        name = method_name.respond_to?(:to_sym) ? method_name.to_sym : method_name
        return name if CLASSIFIABLE.include?(name)

        raise ArgumentError,
              "#{kind} expects the handler method (:on_message or :on_timer) first, got #{method_name.inspect}"
      end
    end

    # Handles one message. An exception marks the message failed; it is logged with its topic,
    # partition, offset and key, and never stops the client.
    #
    # @param context [Prosody::Context]
    # @param message [Prosody::Message]
    # @return [void]
    def on_message(context, message)
      raise NotImplementedError, "#{self.class} must implement on_message(context, message)"
    end

    # Handles a timer of a key, scheduled earlier with {Context#schedule}. It runs in the key's
    # order with its messages, never at the same time as one. An exception marks the timer
    # failed; it stays stored and is retried as the mode says.
    #
    # @param context [Prosody::Context]
    # @param timer [Prosody::Timer]
    # @return [void]
    def on_timer(context, timer)
      raise NotImplementedError, "#{self.class} scheduled a timer but does not implement on_timer(context, timer)"
    end

    # @api private
    # @return [Boolean] whether this handler defines its own on_timer
    def uses_timers?
      method(:on_timer).owner != Prosody::EventHandler
    end
  end
end
