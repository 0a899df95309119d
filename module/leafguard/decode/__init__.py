"""Header-only decoding on the hot path, and deep decoders for the few protocols that carry inventory."""
