"""crossent's internals, one module per layer; the public modules call them in this order:

``validate`` (argument checks, torch's exception classes) -> ``diagnostics`` (misuse warnings)
-> ``dispatch`` (``impl=`` to a backend in ``crossent.backends``) -> ``autograd`` /
``linear_autograd`` / ``vocab_parallel_autograd`` (Functions that call a backend and save
its gradient) and ``softmax``; ``params`` is the options object every layer passes on,
``reference`` the float64 oracle of the tests. See ARCHITECTURE.md.
"""
