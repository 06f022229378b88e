"""Inductor-facing lowering of stamp:: ops (installed as ``stamp_fx.lowering``).

Empty until the compiler backend lands; see the lowering issue.
"""
