"""Drop-in modules (``Fused<Original>``) built from existing modules, sharing their parameters."""
