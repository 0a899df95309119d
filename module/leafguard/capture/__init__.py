"""Frame sources: capture files and live interfaces. Both hand the core `FrameBatch`es."""
