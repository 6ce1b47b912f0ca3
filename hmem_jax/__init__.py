"""hmem_jax: small language models that fetch context-dependent blocks from a hierarchical
memory bank."""

import os as _os

# Object-store URLs go through fsspec (s3fs, gcsfs: hmem_jax/paths.py), also inside orbax and
# etils.epath. With tensorflow installed (the seqio extra) epath would switch to TF's gfile,
# which has no s3:// at all; this keeps epath on fsspec unless the user says otherwise.
_os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
