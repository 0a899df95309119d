"""The asyncio shell around the pure core: sources, the pipeline, outputs, signals and shutdown."""
