# One virtual environment for everything; torch is pinned to the CPU wheel on our machines.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: install data data-glyphs fonts browser test lint demo demo-synthetic demo-oneshot demo-oneshot-fashion bench fuzz clean

FASHION := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite's test files run in parallel (pytest-xdist), one file per worker at a time, so a
# module's fixtures are made once: 575 s instead of about 700 s on the 2-core machine.
test: lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# Fashion-MNIST from Debian's package (offline machines get it this way), unless
# $DEEPMETRIC_DATA/fashion-mnist (default ~/.cache/deepmetric) already holds the four IDX
# files, gzipped or not: deepmetric reads that copy first.
FASHION_CACHE = $(or $(DEEPMETRIC_DATA),$(HOME)/.cache/deepmetric)/fashion-mnist
IDX_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
data:
	@( for f in $(IDX_FILES); do [ -f $(FASHION_CACHE)/$$f ] || [ -f $(FASHION_CACHE)/$$f.gz ] || exit 1; done ) \
	|| [ -d $(FASHION) ] \
	|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# A many-class glyph set (characters as classes, font faces as examples; see
# src/deepmetric/data/glyphs.py): the preset's Debian font packages, installed when missing,
# then GLYPHS/glyphs.npz, idx/, folder/ and manifest.json, unless GLYPHS already holds them
# (configs/glyphs.yaml reads data/glyphs-cjk/glyphs.npz); GLYPH_ARGS go to the generator.
GLYPH_PRESET ?= cjk
GLYPHS ?= data/glyphs-$(GLYPH_PRESET)
fonts: install
	@pkgs="$$($(BIN)/python -m deepmetric.data.glyphs --preset $(GLYPH_PRESET) --packages)" \
	&& { dpkg -s $$pkgs >/dev/null 2>&1 \
	     || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $$pkgs; }; }

data-glyphs: fonts
	@[ -f $(GLYPHS)/manifest.json ] \
	|| $(BIN)/python -m deepmetric.data.glyphs --preset $(GLYPH_PRESET) --out $(GLYPHS) $(GLYPH_ARGS)

# Debian's Chromium and its WebDriver, for the page test (tests/test_page.py): installed
# only when missing.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
	|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

# The main job: train the default config on Fashion-MNIST and evaluate it on the test set.
# Run again: resumes (or just reports) the finished run instead of overwriting it.
DEMO_RUN := runs/fashion_mnist_demo
demo: install data
	@if [ -d $(DEMO_RUN)/checkpoints ]; then $(BIN)/deepmetric train --resume $(DEMO_RUN); \
	else $(BIN)/deepmetric train configs/fashion_mnist.yaml out=$(DEMO_RUN) $(ARGS); fi

# One minute, no data needed: every loss on synthetic open-set data.
demo-synthetic: install
	$(BIN)/deepmetric demo $(ARGS)

# One-shot identification of characters never trained on: train configs/glyphs.yaml on the
# glyph set (or reuse ONESHOT_RUN), enroll the Noto Sans SC Regular image of each of 100 unseen
# characters, identify their 30 other faces and every image of 100 other unseen characters
# (strangers), with the threshold at a false accept rate of 1e-3 on the validation characters;
# ARGS are training overrides (e.g. data=npz:FILE epochs=1).
ONESHOT_RUN := runs/oneshot_glyphs
ONESHOT_ENROLL ?= 100
ONESHOT_STRANGERS ?= 100
ONESHOT_FACE ?= noto-sans-sc-regular
ONESHOT_FAR ?= 1e-3
demo-oneshot: install data-glyphs
	$(BIN)/deepmetric demo-oneshot --config configs/glyphs.yaml --run $(ONESHOT_RUN) \
	  --enroll $(ONESHOT_ENROLL) --stranger-classes $(ONESHOT_STRANGERS) \
	  --enroll-face $(ONESHOT_FACE) --far $(ONESHOT_FAR) data=npz:$(GLYPHS)/glyphs.npz $(ARGS)

# The earlier one-shot demo on Fashion-MNIST (train on 0, 1, 3, 5, validate on 2, 4, enroll one
# test image of each of 6-9, strangers from the trained classes): a small demo, no target.
OPENSET_RUN := runs/oneshot_openset
demo-oneshot-fashion: install data
	$(BIN)/deepmetric demo-oneshot --config configs/openset.yaml --run $(OPENSET_RUN) $(ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/losses.py
	$(BIN)/python benchmarks/train.py

# Long fuzzing (tests/test_fuzz.py runs a few examples in `make test`): FUZZ_EXAMPLES hypothesis
# examples per property, then FUZZ_SECONDS of coverage-guided atheris per target (idx, image,
# config); a crash leaves its input in crash-* (see tests/fuzz_atheris.py).
FUZZ_EXAMPLES ?= 20000
FUZZ_SECONDS  ?= 120
fuzz: install
	$(BIN)/python -m pip install --quiet -e ".[fuzz]"
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py
	for target in idx image config; do \
	  $(BIN)/python tests/fuzz_atheris.py $$target -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
