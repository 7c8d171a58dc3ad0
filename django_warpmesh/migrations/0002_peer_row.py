from django.db import migrations


class Migration(migrations.Migration):
    """The model is renamed PeerRow (what it holds: a row of the peer table); its table keeps
    its name, so nothing changes in the database and nodes of both versions share it."""

    dependencies = [
        ("django_warpmesh", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RenameModel(old_name="Peer", new_name="PeerRow"),
                migrations.AlterModelTable(name="peerrow", table="django_warpmesh_peer"),
            ],
            database_operations=[],
        ),
    ]
