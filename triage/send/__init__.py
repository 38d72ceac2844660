"""send: destinations (C-STORE, MLLP, ...) the durable outbox delivers to, with retries and back-off."""
