"""`debiformer recipes`: list the shipped recipes and print one fully resolved."""

import typer

from debiformer.cli import options

app = typer.Typer(
    help="List the shipped recipes, or print one fully resolved (`recipes show NAME`).",
    invoke_without_command=True,
)


@app.callback()
def recipes(ctx: typer.Context) -> None:
    """List the shipped recipes with their descriptions (use one by name: `debiformer train tiny`)."""
    if ctx.invoked_subcommand is not None:
        return
    from debiformer.recipe import list_recipes

    shipped = list_recipes()
    width = max((len(name) for name, _ in shipped), default=0)
    for name, description in shipped:
        typer.echo(f"{name:<{width}}  {description}".rstrip())


@app.command()
def show(
    recipe: str = options.RECIPE,
    overrides: list[str] = options.OVERRIDES,
) -> None:
    """Print RECIPE fully resolved (bases merged, defaults filled, its task's keys only) as YAML
    `debiformer train` accepts."""
    from debiformer.recipe import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides)
    typer.echo(recipe_to_yaml(resolved), nl=False)
