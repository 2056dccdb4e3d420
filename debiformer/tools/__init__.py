"""The library side of the commands other than `train` and `eval`: `debiformer bench`
(`tools.bench`), `debiformer profile` (`tools.profile`) and `debiformer data bench`
(`tools.loader_bench`). The model and training code never import these modules."""
