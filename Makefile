# Two entry points: `make demo` (the main job on built-in defaults) and `make test` (the suite).
# Each creates .venv when missing and installs everything into it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test suite trainer-tests lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned, by pip, which finds the CPU build on this disk: an unpinned
	# torch pulls a multi-GB CUDA build here. The rest by uv, which keeps that torch and
	# installs the others in seconds where pip takes a minute; compiled to bytecode as pip
	# does (where PYTHONDONTWRITEBYTECODE is set, every process would compile them again).
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 uv==0.13.10
	$(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e '.[dev,hf]'
	touch $(STAMP)

# A small GPT whose layers take milliseconds on a CPU, for the measured steps of the demo.
DEMO_MODEL := gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024

# The chain as far as it is built: presets -> layer graphs -> a plan checked and saved ->
# a profile measured here and one derived for 1024 H100s -> an estimate -> a search -> a
# plan trained on two local processes and verified against one.
demo: $(STAMP)
	$(PY) -m autoplan models
	$(PY) -m autoplan inspect --model gpt3-1.7b
	$(PY) -m autoplan inspect --model llama3-70b
	$(PY) -m autoplan inspect --model llama3-8b --world-size 64 --global-batch 512 \
		--plan "tp=8,pp=4,ckpt=full,zero=1" -o out/demo
	@echo "wrote out/demo/graph.json and out/demo/plan.json"
	$(PY) -m autoplan profile --model "$(DEMO_MODEL)" --nproc 2 --micro-batches 1,2,4 \
		--tp 1,2 --repeats 5 --comm-sizes 4096,65536,1048576,4194304 -o out/demo/profile-local
	$(PY) -m autoplan profile --model llama3-70b --mode analytic \
		--cluster h100-sxm:nodes=128 -o out/demo/profile-h100
	$(PY) -m autoplan estimate --model gpt-22b --cluster a100-80g:gpus=8 --global-batch 4 \
		--plan "tp=8,micro_batch=4,ckpt=selective,sequence_parallel=true" --dtype fp16 \
		--attention math
	$(PY) -m autoplan search --model llama3-70b --cluster h100-sxm:gpus=1024 \
		--global-batch 2048 -o out/demo/plan-llama3-70b.json
	$(PY) -m autoplan run --model "$(DEMO_MODEL)" --plan "dp=2,micro_batch=2" --nproc 2 \
		--steps 6 --profile out/demo/profile-local --verify

# The trainers that read `autoplan export` back in tests/trainers live in a test-only venv
# layered on .venv (a .pth file puts .venv's packages, torch among them, after its own):
# torchtitan 0.3.0 pins datasets<4.8, whose huggingface-hub transformers 5 refuses, so they
# cannot share one environment. DeepSpeed is a source package that builds against the torch
# installed (no build isolation, no compiled ops).
TRAINERS       := .venv-trainers
TRAINERS_STAMP := $(TRAINERS)/.installed-stamp
TRAINERS_REQS  := tests/trainers/requirements.txt

$(TRAINERS_STAMP): $(STAMP) $(TRAINERS_REQS)
	test -x $(TRAINERS)/bin/python || python3 -m venv $(TRAINERS)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(TRAINERS)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/autoplan-venv.pth"
	$(TRAINERS)/bin/pip install -q --disable-pip-version-check wheel
	DS_BUILD_OPS=0 $(TRAINERS)/bin/pip install -q --disable-pip-version-check \
		--no-build-isolation -r $(TRAINERS_REQS)
	touch $@

# The suite, and beside it (make -j2) the trainer venv's install and the tests that use it.
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target suite trainer-tests

suite: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not trainers"

trainer-tests: $(TRAINERS_STAMP)
	AUTOPLAN_TRAINERS_PYTHON=$(CURDIR)/$(TRAINERS)/bin/python $(PY) -m pytest -q -m trainers -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(TRAINERS) build *.egg-info
