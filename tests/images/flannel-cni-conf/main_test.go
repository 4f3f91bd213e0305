package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// What flanneld v0.28 writes with --ip-masq and the vxlan backend
// (pkg/subnet/subnet.go WriteSubnetFile: the subnet as its first address).
const sampleEnv = `FLANNEL_NETWORK=10.244.0.0/16
FLANNEL_SUBNET=10.244.1.1/24
FLANNEL_MTU=1450
FLANNEL_IPMASQ=true
`

func TestRenderMatchesFlannelDelegate(t *testing.T) {
	env, err := parseSubnetEnv(sampleEnv)
	if err != nil {
		t.Fatal(err)
	}
	got, err := renderConflist(env, "0.3.1")
	if err != nil {
		t.Fatal(err)
	}
	want := `{
  "cniVersion": "0.3.1",
  "name": "cbr0",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "hairpinMode": true,
      "ipMasq": false,
      "mtu": 1450,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [
            {
              "subnet": "10.244.1.0/24"
            }
          ]
        ],
        "routes": [
          {
            "dst": "10.244.0.0/16"
          }
        ],
        "dataDir": "/var/lib/cni/networks"
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
`
	if string(got) != want {
		t.Fatalf("conflist:\n%s\nwant:\n%s", got, want)
	}
}

func TestIPMasqInverted(t *testing.T) {
	env, err := parseSubnetEnv(strings.Replace(sampleEnv, "FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false", 1))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := renderConflist(env, "0.3.1")
	var cl struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &cl); err != nil {
		t.Fatal(err)
	}
	if cl.Plugins[0]["ipMasq"] != true {
		t.Fatalf("flanneld without --ip-masq: bridge must masquerade, got %v", cl.Plugins[0]["ipMasq"])
	}
}

func TestDualStack(t *testing.T) {
	env, err := parseSubnetEnv(sampleEnv +
		"FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := renderConflist(env, "0.3.1")
	var cl struct {
		Plugins []struct {
			IPAM ipam `json:"ipam"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &cl); err != nil {
		t.Fatal(err)
	}
	got := cl.Plugins[0].IPAM
	wantRanges := [][]rangeEntry{{{"10.244.1.0/24"}}, {{"fd00:10:244:1::/64"}}}
	wantRoutes := []route{{"10.244.0.0/16"}, {"fd00:10:244::/56"}}
	if !reflect.DeepEqual(got.Ranges, wantRanges) || !reflect.DeepEqual(got.Routes, wantRoutes) {
		t.Fatalf("ranges %v routes %v", got.Ranges, got.Routes)
	}
}

func TestParseErrors(t *testing.T) {
	for name, text := range map[string]string{
		"empty":      "",
		"no mtu":     "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPMASQ=true\n",
		"no ipmasq":  "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n",
		"bad subnet": "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
		"no network": "FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
		"truncated":  "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUB",
		"bad ipmasq": strings.Replace(sampleEnv, "=true", "=yes", 1),
		"zero mtu":   strings.Replace(sampleEnv, "=1450", "=0", 1),
	} {
		if _, err := parseSubnetEnv(text); err == nil {
			t.Errorf("%s: parsed without error", name)
		}
	}
}

func TestSyncOnceWritesAndRewrites(t *testing.T) {
	dir := t.TempDir()
	envFile := filepath.Join(dir, "run", "subnet.env")
	conf := filepath.Join(dir, "net.d", "10-flannel.conflist")

	if _, err := syncOnce(envFile, conf, "0.3.1"); err != errNotYet {
		t.Fatalf("missing subnet.env: err %v, want errNotYet", err)
	}
	if err := os.MkdirAll(filepath.Dir(envFile), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(envFile, []byte(sampleEnv), 0o644); err != nil {
		t.Fatal(err)
	}
	if wrote, err := syncOnce(envFile, conf, "0.3.1"); err != nil || !wrote {
		t.Fatalf("first sync: wrote %v err %v", wrote, err)
	}
	if wrote, err := syncOnce(envFile, conf, "0.3.1"); err != nil || wrote {
		t.Fatalf("unchanged sync: wrote %v err %v", wrote, err)
	}
	if err := os.WriteFile(envFile, []byte(strings.Replace(sampleEnv, "10.244.1.1/24", "10.244.7.1/24", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if wrote, err := syncOnce(envFile, conf, "0.3.1"); err != nil || !wrote {
		t.Fatalf("changed sync: wrote %v err %v", wrote, err)
	}
	b, err := os.ReadFile(conf)
	if err != nil || !strings.Contains(string(b), `"10.244.7.0/24"`) {
		t.Fatalf("conflist after change: %s (%v)", b, err)
	}
	// Only the conflist is left in the directory (no temp files).
	ents, _ := os.ReadDir(filepath.Dir(conf))
	if len(ents) != 1 {
		t.Fatalf("net.d holds %d entries, want 1", len(ents))
	}
	// A garbled subnet.env keeps the last good conflist.
	if err := os.WriteFile(envFile, []byte("FLANNEL_NET"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := syncOnce(envFile, conf, "0.3.1"); err == nil {
		t.Fatal("garbled subnet.env accepted")
	}
	if b2, _ := os.ReadFile(conf); string(b2) != string(b) {
		t.Fatal("garbled subnet.env changed the conflist")
	}
}
