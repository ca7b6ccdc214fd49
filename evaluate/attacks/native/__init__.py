"""pyautoattack's attacks re-implemented for merged device batches (``engine.NativeEngine``); the shared
primitives live in ``_batches``, one module per attack beside them."""
