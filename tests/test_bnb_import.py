"""Importing bitsandbytes the quiet way (``qpeft.import_bitsandbytes``, core/base/bnb.py; the
quantizers reach it as plugins/quantizers/_bnb.py's, the paged optimizers through
core/train/optim.py): no Hugging Face Hub lookup for the ``kernels-community`` CPU kernel (a
network call on every import, a stray line offline), no notice on stderr, and an installed
``kernels`` package left as it was."""
import subprocess
import sys
import textwrap


FAKE_KERNELS = textwrap.dedent("""
    import sys
    CALLS = []
    def get_kernel(*args, **kwargs):
        CALLS.append(args)
        print("kernels.get_kernel called", file=sys.stderr)
        raise RuntimeError("no network")
    """)


def run_with_fake_kernels(tmp_path, code: str):
    """``code`` in a fresh interpreter whose ``kernels`` is a fake that records each Hub request."""
    (tmp_path / "kernels.py").write_text(FAKE_KERNELS)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


def test_bitsandbytes_imports_without_asking_the_kernels_package_and_without_a_notice(tmp_path):
    code = textwrap.dedent("""
        import sys
        import kernels                                   # installed and already imported (transformers does)
        from qpeft.plugins.quantizers._bnb import import_bitsandbytes
        bnb = import_bitsandbytes()
        assert sys.modules["kernels"] is kernels and kernels.CALLS == [], kernels.CALLS
        assert bnb.functional.quantize_4bit is not None
        print("ok")
        """)
    done = run_with_fake_kernels(tmp_path, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert "kernels" not in done.stderr and "trust" not in done.stderr, done.stderr


def test_the_paged_optimizers_import_bitsandbytes_the_quiet_way_too(tmp_path):
    """``--optimizer paged_adamw_32bit``/``8bit`` (core/train/optim.py) builds bitsandbytes'
    optimizer with ``kernels`` hidden while bitsandbytes imports (seen by an import watcher, on
    any CPU), so nothing asks the Hub (on AVX512-BF16 CPUs a plain import would)."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        import torch
        import kernels
        seen = []                           # sys.modules["kernels"] when bitsandbytes is imported

        class Watch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "bitsandbytes":
                    seen.append(sys.modules.get("kernels", "absent"))
        sys.meta_path.insert(0, Watch())
        from qpeft.core.settings.config import TrainConfig
        from qpeft.core.train.optim import build_optimizer
        params = [torch.nn.Parameter(torch.zeros(4))]
        built = [build_optimizer(params, TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.0), torch.device("cuda"))
                 for name in ("paged_adamw_32bit", "paged_adamw_8bit")]
        assert [type(o).__name__ for o in built] == ["PagedAdamW32bit", "PagedAdamW8bit"], built
        assert built[0].param_groups[0]["lr"] == 1e-3
        assert seen == [None], seen         # imported once, with kernels hidden
        assert sys.modules["kernels"] is kernels and kernels.CALLS == [], kernels.CALLS
        print("ok")
        """)
    done = run_with_fake_kernels(tmp_path, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert "kernels" not in done.stderr and "trust" not in done.stderr, done.stderr
