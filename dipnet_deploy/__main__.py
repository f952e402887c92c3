from dipnet_deploy.cli import run

run()
