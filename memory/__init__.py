"""Memory for the proxy: MemCubes (plaintext), activation (KV) and parametric (LoRA).

This package never imports ``proxy``; the proxy reaches memory through
:class:`memory.layer.MemoryLayer`.
"""
