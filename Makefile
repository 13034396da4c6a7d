# The two commands of the README: `make demo` and `make test`. Both set themselves up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfa-fast-installed
DEMO_DATA := data/cmnist

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): setup.py requirements-cpu.txt scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

# Colored MNIST at the four ratios from the embedded MNIST files (once) and the counts of 1%,
# then DisEnt with the published preset (50,000 steps, one CPU thread), its final table and the
# figure of its curves (RUN/curves.png).
demo: setup
	@[ -d $(DEMO_DATA)/0.5pct ] && [ -d $(DEMO_DATA)/1pct ] && [ -d $(DEMO_DATA)/2pct ] && \
	    [ -d $(DEMO_DATA)/5pct ] || \
	    $(PY) -m dfa_fast prepare cmnist --src data/mnist --out $(DEMO_DATA) --overwrite
	$(PY) -m dfa_fast data info $(DEMO_DATA)/1pct/train.beton
	run=runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(PY) -m dfa_fast train --preset cmnist --ratio 1 --method disent --data $(DEMO_DATA) \
	    --out $$run && \
	$(PY) -m dfa_fast plot $$run

test: setup
	$(PY) -m pytest -q tests
