module isthmus.local/flannel-cni-conf

go 1.26.0
