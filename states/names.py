"""The product's workflow names, as the `workflow` column of jobs holds them. Its own
module so a command that only reads jobs needs nothing of the workflows themselves."""

IMAGE_WORKFLOW = "image"
SNAPSHOT_WORKFLOW = "snapshot"
