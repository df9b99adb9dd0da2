"""The controller installs and runs without torch (or ray, torch_npu, vllm)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_controller_imports_and_builds_its_app_with_torch_unimportable() -> None:
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torch_npu", "ray", "vllm"):
                    raise ImportError(f"{name} is blocked in this test")
                return None
        sys.meta_path.insert(0, Block())
        from eep_controller.api.app import create_app
        from eep_controller.api.auth import TokenAuth
        from eep_controller.api.context import ControllerContext
        from eep_controller.cli import ctl, server, runtime
        from eep_controller.config import Settings
        from eep_controller.store import EtcdConnection, EtcdStore, KeySpace, LeaderElection
        import eep_controller.planner, eep_controller.operations
        s = Settings()
        store = EtcdStore(EtcdConnection(["http://127.0.0.1:1"]), KeySpace())
        ctx = ControllerContext(settings=s, store=store, election=LeaderElection(store, "r", "a"), auth=TokenAuth(s.auth))
        app = create_app(ctx)
        assert "/v1/deployments" in app.openapi()["paths"]
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
