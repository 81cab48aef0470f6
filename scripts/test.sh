#!/usr/bin/env bash
# Lint, type-check and run the tests. Extra arguments go to pytest.
# The default suite leaves out tests marked `slow`; with CI=true or VTPM_SLOW=1 they run too.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench scripts || exit 1
.venv/bin/ruff format --check src tests bench scripts || exit 1
.venv/bin/mypy || exit 1
marker=(-m "not slow")
if [ "${CI:-}" = "true" ] || [ "${VTPM_SLOW:-}" = "1" ]; then marker=(); fi
.venv/bin/pytest "${marker[@]}" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
