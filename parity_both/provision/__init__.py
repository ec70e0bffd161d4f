"""Provisioning: a lane's engine (llama-cpp-python, or our C++ harness built against a llama.cpp-family
tree), probed cheaply at parse time and built or installed on demand by the backend rule.

    specs.py      what a backend is: BackendSpec, the built-in lanes, the keys its builds are cached under
    probes.py     is it there, and which one (cheap, deterministic), the probe stamps the workflow writes
    fetch.py      getting sources and packages (git, sdist, pip), retried with backoff
    build.py      building an engine's shared libraries (and the build-step plumbing)
    harness.py    building and running the C++ harness (harness/parity_harness.cpp)
    provision.py  making a backend usable: repair mode, repair, identity; the backend rule's body
    failures.py   BackendFailure and its exit codes (2 missing/unusable, 3 network, 4 permission,
                  5 build, 6 recursion)
    backends.py   the command line (``python -m parity_both.provision.backends``) and the public names
"""
