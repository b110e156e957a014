"""llmc: a declarative, compiler-style optimization framework for LLM inference.

The flow is one way: spec -> frontend -> IR -> pass pipeline -> target -> artifact -> golden check.
"""

from __future__ import annotations

__version__ = "0.1.0"
