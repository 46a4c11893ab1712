"""Tiered image duplicate detection: scan -> screen -> candidates -> verify -> confirm -> decide -> write."""
__version__ = "0.1.0"
