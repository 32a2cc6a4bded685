"""A fleet: several daemons sharing one PostgreSQL catalog (docs/fleet.md)."""
