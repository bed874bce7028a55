"""What a cell is asked to do: the typed schema behind conf/ (`schema`), the rules a composed config
must satisfy (`rules`) and the registries of named choices (`registry`). No torch here."""
