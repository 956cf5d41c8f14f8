"""Host bookkeeping (scheduler, page allocator, prefix cache, stop rules, request parameters,
the async front end and the gRPC layer) must not import jax: it stays testable in microseconds
and the server's threads never contend with tracing."""

import subprocess
import sys

HOST_MODULES = [
    "jaxserve.engine.block_manager", "jaxserve.engine.engine", "jaxserve.engine.async_engine",
    "jaxserve.engine.scheduler",
    "jaxserve.engine.sequence", "jaxserve.engine.stopping", "jaxserve.engine.sampling_params",
    "jaxserve.engine.protocol", "jaxserve.server.server", "jaxserve.client", "jaxserve.tokenizer",
    "jaxserve.speculative.policy",
]


def test_host_modules_do_not_import_jax():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in HOST_MODULES) +
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
