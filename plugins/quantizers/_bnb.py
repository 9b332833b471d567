"""What the two bitsandbytes quantizers (``nf4``, ``int8``) share: importing bitsandbytes
quietly, now the public ``qpeft.import_bitsandbytes`` (core/base/bnb.py, which the paged
optimizers use too); kept here under its old name for the modules that import it from here.
A private module of the plugins package (its name starts with ``_``, so discovery skips it),
not a plugin: neither built-in imports the other, as third-party plugins could not.
"""
from qpeft import import_bitsandbytes  # noqa: F401  (nf4, int8 and _icq import it from here)
