"""The library side of the commands other than `train` and `eval`: `debiformer bench`
(`tools.bench`), `debiformer profile` (`tools.profile`), `debiformer data bench`
(`tools.loader_bench`), `debiformer export` (`tools.export`), `debiformer show` (`tools.show`) and
`debiformer plot` (`tools.plot`). The model and training code never import these modules (a
training draws its curves.png with `debiformer.curves`, which `tools.plot` uses too)."""
