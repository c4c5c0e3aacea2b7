"""Start an ipykernel on this host for the spark_gateway; the launcher itself is `sg_ipykernel` (see its docstring).

This file stays a few lines: Python compiles a main script at every start (~25 ms of CPU per kernel for the whole
launcher), while an imported module's bytecode is cached in __pycache__ (`jupyter ssh-spec sync` writes it).
"""

import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.realpath(__file__))
    if here not in sys.path:  # PYTHONSAFEPATH or -P leave the script's own directory out
        sys.path.insert(0, here)
    import sg_ipykernel

    sg_ipykernel.main()
