"""server: the `veq` command, the OpenAI-compatible HTTP app, the engine and the load tester.

The top floor: imports `veq` and `kernels`; nothing imports it.
"""
