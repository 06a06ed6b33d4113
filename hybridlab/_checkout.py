"""A repository checkout on sys.path must not shadow installed packages named like its
top-level source folders: `kernels/` (installed as `hybridlab.kernels`) against Hugging Face's
`kernels`, which transformers >= 5.25 requires and imports. `python -m hybridlab` and
`python -m pytest` put the working directory first on sys.path, so from the checkout's root
`import kernels` would find ours."""
from __future__ import annotations

import sys
from pathlib import Path


def keep_checkout_last() -> None:
    """Move this checkout's root to the end of sys.path (still there for `tests.*`; hybridlab
    itself is found through its install). No-op outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels" / "__init__.py").is_file():
        return

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or ".").resolve() == root
        except OSError:
            return False

    ours = [p for p in sys.path if is_root(p)]
    if ours:
        sys.path[:] = [p for p in sys.path if not is_root(p)] + ours
