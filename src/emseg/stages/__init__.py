"""One module per DVC stage (and per further pipeline): read params, call the core, write the outputs."""
