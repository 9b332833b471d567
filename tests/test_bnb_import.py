"""Importing bitsandbytes the quiet way (plugins/quantizers/_bnb.py): no Hugging Face Hub lookup
for the ``kernels-community`` CPU kernel (a network call on every import, a stray line offline),
no notice on stderr, and an installed ``kernels`` package left as it was."""
import subprocess
import sys
import textwrap


def test_bitsandbytes_imports_without_asking_the_kernels_package_and_without_a_notice(tmp_path):
    (tmp_path / "kernels.py").write_text(textwrap.dedent("""
        import sys
        CALLS = []
        def get_kernel(*args, **kwargs):
            CALLS.append(args)
            print("kernels.get_kernel called", file=sys.stderr)
            raise RuntimeError("no network")
        """))
    code = textwrap.dedent("""
        import sys
        import kernels                                   # installed and already imported (transformers does)
        from qpeft.plugins.quantizers._bnb import import_bitsandbytes
        bnb = import_bitsandbytes()
        assert sys.modules["kernels"] is kernels and kernels.CALLS == [], kernels.CALLS
        assert bnb.functional.quantize_4bit is not None
        print("ok")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert "kernels" not in done.stderr and "trust" not in done.stderr, done.stderr
