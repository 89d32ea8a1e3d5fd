#!/usr/bin/env bash
# The packages as a user gets them: `dotnet pack` the three packages (EarlyExit.Core, EarlyExit.Experiments and the
# earlyexit tool) into a local folder feed; build both samples outside the repository (none of its MSBuild files,
# no project references) against the packages from that feed, and run them; install the tool from the feed and run
# it, with the C# sample as its plugin. Needs a Release build of the solution (scripts/test.sh makes one).
#
#   bash scripts/packages-test.sh [WORK_DIR]
#
# Every run packs a version of its own (0.1.0-test.N), so NuGet's global packages folder never serves a stale copy;
# what it extracted there for those versions is removed at the end (nothing else in it is touched).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${1:-$(mktemp -d)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
version="0.1.0-test.$(date +%s)"
feed="$work/feed"
cleanup() {
  for id in earlyexit.core earlyexit.experiments earlyexit; do
    rm -rf "${NUGET_PACKAGES:-$HOME/.nuget/packages}/$id/$version"
    rmdir "${NUGET_PACKAGES:-$HOME/.nuget/packages}/$id" 2>/dev/null || true
  done
}
trap cleanup EXIT

step() { echo "== $*"; }

step "pack $version into $feed"
dotnet pack EarlyExit.sln -c Release --no-build -nologo -v q -clp:ErrorsOnly -p:Version="$version" -o "$feed"
ls -l "$feed"
for p in EarlyExit.Core EarlyExit.Experiments earlyexit; do [ -s "$feed/$p.$version.nupkg" ] || { echo "missing package $p"; exit 1; }; done

# A user's folder: the feed as a source beside the machine's own (nuget.org or its mirror).
cat > "$work/nuget.config" <<EOF
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <add key="earlyexit-local" value="$feed" />
  </packageSources>
</configuration>
EOF
project() { # KIND NAME PACKAGE -> a project file of a user's console app
  cat <<EOF
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <RuntimeIdentifier>linux-x64</RuntimeIdentifier>
    <SelfContained>false</SelfContained>
    <AssemblyName>$2</AssemblyName>
    <Nullable>enable</Nullable>
  </PropertyGroup>
  <ItemGroup>
$( [ "$1" = fs ] && printf '    <Compile Include="Sample.fs" />\n    <Compile Include="Program.fs" />\n' )
    <PackageReference Include="$3" Version="$version" />
  </ItemGroup>
</Project>
EOF
}

step "the F# sample against EarlyExit.Experiments $version"
mkdir -p "$work/fs"
cp "$repo"/samples/CustomModel.FSharp/{Sample.fs,Program.fs} "$work/fs/"
project fs CustomModel.FSharp EarlyExit.Experiments > "$work/fs/CustomModel.FSharp.fsproj"
dotnet build "$work/fs/CustomModel.FSharp.fsproj" -c Release -nologo -v q -clp:ErrorsOnly
fsbin="$work/fs/bin/Release/net10.0/linux-x64"
[ -f "$fsbin/earlyexit-numerics-probe.dll" ] || { echo "the numerics probe did not reach the F# sample's output"; exit 1; }
[ -f "$fsbin/libearlyexit-scalars.so" ] || { echo "the scalar shim did not reach the F# sample's output"; exit 1; }
# The package's build layer of the libstdc++ workaround: where this machine's libstdc++ lacks GLIBCXX_3.4.32, the
# output's copy of libLibTorchSharp.so has that version-needs entry marked weak (and the NuGet cache's copy not).
libstdcxx=$(ls /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib64/libstdc++.so.6 2>/dev/null | head -n 1 || true)
if command -v readelf >/dev/null && [ -n "$libstdcxx" ] && ! grep -qa GLIBCXX_3.4.32 "$libstdcxx"; then
  readelf -V "$fsbin/libLibTorchSharp.so" | grep "GLIBCXX_3.4.32  Flags: WEAK" >/dev/null \
    || { echo "the F# sample's libLibTorchSharp.so is not patched"; exit 1; }
  cached=$(ls "${NUGET_PACKAGES:-$HOME/.nuget/packages}"/torchsharp/*/runtimes/linux-x64/native/libLibTorchSharp.so 2>/dev/null | head -n 1 || true)
  if readelf -V "$cached" | grep "GLIBCXX_3.4.32  Flags: WEAK" >/dev/null; then echo "the NuGet cache's $cached was written"; exit 1; fi
  echo "libLibTorchSharp.so patched in the output, as shipped in the NuGet cache"
fi
dotnet "$fsbin/CustomModel.FSharp.dll" --out "$work/fs-out" | tee "$work/fs.log"
grep -q "^test accuracy per exit" "$work/fs.log"
[ -s "$work/fs-out/run/metrics.json" ]

step "the C# sample against EarlyExit.Core $version"
mkdir -p "$work/cs"
cp "$repo"/samples/CustomModel.CSharp/*.cs "$work/cs/"
project cs CustomModel.CSharp EarlyExit.Core > "$work/cs/CustomModel.CSharp.csproj"
dotnet build "$work/cs/CustomModel.CSharp.csproj" -c Release -nologo -v q -clp:ErrorsOnly
csbin="$work/cs/bin/Release/net10.0/linux-x64"
dotnet "$csbin/CustomModel.CSharp.dll" "$work/fs-out/images" 1 5 | tee "$work/cs.log"
grep -q "^exit 3: test accuracy" "$work/cs.log"

step "the earlyexit tool $version from the feed"
dotnet tool install --tool-path "$work/tools" earlyexit --version "$version" --add-source "$feed"
ee() { "$work/tools/earlyexit" "$@"; }
ee --version
ee models | grep resnet34 >/dev/null
ee doctor | tee "$work/doctor.log"
grep -q "native scalars: deferred release" "$work/doctor.log"
ee --plugin "$csbin/CustomModel.CSharp.dll" models | grep tinycnn >/dev/null
ee --plugin "$csbin/CustomModel.CSharp.dll" train --strategy sequential-ewc --model tinycnn --data image-folder \
  --data-root "$work/fs-out/images" --scale smoke --out "$work/tool-run"
ee --plugin "$csbin/CustomModel.CSharp.dll" eval "$work/tool-run" --timing-samples 16
echo "packages: all checks passed"
