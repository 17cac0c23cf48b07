"""Run untrusted programs to a verdict: namespaces, cgroups, a per-slot uid, a warm fork server.

    with Sandbox() as box:
        verdict = box.run(source, Limits(timeout_s=3))
"""

from mtp.sandbox.limits import Limits
from mtp.sandbox.sandbox import OracleProgram, Sandbox, SandboxConfig, SandboxUnavailable, isolation_problem
from mtp.sandbox.verdict import STATUSES, Verdict

__all__ = ["Limits", "OracleProgram", "Sandbox", "SandboxConfig", "SandboxUnavailable", "STATUSES", "Verdict", "isolation_problem"]
