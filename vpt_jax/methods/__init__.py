"""Adaptation methods as plug-ins: one module per method family, ``registry`` names them."""
