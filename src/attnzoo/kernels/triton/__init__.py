"""Fused Triton kernels. Imported lazily (only when the triton backend is chosen), so that
``TRITON_INTERPRET`` set by a test harness before first use takes effect."""
