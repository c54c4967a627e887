"""The model side: hashing (numpy only), the gated Engram module, the GPT, the prefetcher, the
training loop and its Ray Train launch. Needs the `train` extra (torch, tokenizers)."""

import importlib.util as _util

_MISSING = [m for m in ("torch", "tokenizers") if _util.find_spec(m) is None]
if _MISSING:
    raise ImportError(
        f"the trainer package needs {' and '.join(_MISSING)}, which this environment lacks; "
        "install the train extra: pip install 'engram[train]'",
        name=_MISSING[0],
    )
