#!/bin/sh
# Test stand-in for shoal-install.sh's host command prefix (nsenter ...):
# appends the command it was given to the log file $1 instead of running it.
log=$1; shift
echo "$*" >>"$log"
