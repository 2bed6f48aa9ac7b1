"""Data: offline corpora -> tokenized train/val token files -> fixed-length blocks with exact epochs.

``fewstep data`` calls :func:`build`; training calls :func:`ensure` and reads :class:`TokenBlocks`.
"""

from fewstep.data.corpus import build, ensure
from fewstep.data.stream import TokenBlocks, load_meta
from fewstep.data.tokenizers import Tokenizer, get_tokenizer

__all__ = ["Tokenizer", "TokenBlocks", "build", "ensure", "get_tokenizer", "load_meta"]
