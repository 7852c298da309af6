"""kernels: pure tensor ops (Triton low-bit GEMMs and their torch references).

The bottom floor: no nn.Modules, and it imports neither `veq` nor `server`.
"""
