"""Runs the README's quickstart (its first ```python block after '## Quickstart') as a user
would, in whatever environment runs this file: `make test-wheel` runs it in a fresh venv that
holds only the wheel and its declared dependencies."""

import re
import sys

text = open(sys.argv[1]).read()
section = text.split("## Quickstart", 1)[1]
code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
scope: dict = {}
exec(compile(code, "README quickstart", "exec"), scope)
out, last = scope["out"], scope["last"]
assert out.shape == scope["u"].shape and last.shape == (scope["b"], scope["d"], scope["n"])
assert bool(out.isfinite().all()), "quickstart output has NaN/Inf"
print(f"README quickstart ran: out {tuple(out.shape)}, last_state {tuple(last.shape)}")
