"""qmgrd: the daemon. Imports SQLAlchemy, numpy and plugins; the client never imports this."""
