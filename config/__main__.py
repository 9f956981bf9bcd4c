"""`python -m config > docs/CONFIG.md`: print the config reference generated from the schema."""
from config.schema import render_reference

print(render_reference(), end="")
