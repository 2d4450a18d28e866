"""Developer tools of the core (docs generation); not used at run time."""
