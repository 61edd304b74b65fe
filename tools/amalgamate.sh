#!/usr/bin/env bash
# amalgamate.sh: writes the single-file drop-in (stb style) GENERATED from the library's real sources.
#
# Usage: tools/amalgamate.sh [OUT]          (default dist/scmoe_all.h; runs from the repository root)
#
# The output holds, in this order:
#   - the public headers: scmoe.h, then scmoe_mpi.h unless SCMOE_NO_MPI is defined;
#   - under `#ifdef SCMOE_IMPLEMENTATION` (once per program): the system headers the .c files include,
#     the internal headers (each once, every header after the headers it includes), then every .c
#     file of the library in the Makefile's order.
# Every `#include "..."` of a project header is dropped: each header is inlined exactly once.
#
# One translation unit has one file scope, so two things separate compilation gave for free are redone:
#   - a file-scope name a .c file keeps to itself (static function or variable, type, struct tag,
#     enumerator) that another .c file also defines is renamed in that file, by `#define name
#     file_name` before the file and `#undef name` after it. The clashes are found automatically
#     (universal-ctags when installed, a regex over `static ... name(` and typedefs otherwise);
#   - every macro a .c file #defines is #undef'd after the file.
#
# The sources are read from the Makefile (CORE_SRC, BLAS_SRC, and MPI_SRC as with MPI=1); the
# environment variables SCMOE_SRC and SCMOE_MPI_SRC override them. The MPI_SRC files, and any header
# only they include, are left out when SCMOE_NO_MPI is defined.
set -euo pipefail
if [[ -n ${1:-} ]]; then OUT=$(realpath -m -- "$1"); fi   # relative to the caller's directory
cd "$(dirname "$0")/.."
OUT=${OUT:-dist/scmoe_all.h}
PUBLIC_HEADERS="scmoe.h scmoe_mpi.h"
PUBLIC_MPI_HEADERS="scmoe_mpi.h"   # left out under SCMOE_NO_MPI

die() { echo "amalgamate: $*" >&2; exit 1; }

# ---- the sources, from the Makefile ----
make_var() { # make_var NAME -> the value of $(NAME) in the Makefile, evaluated with MPI=1
    env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s --no-print-directory -f Makefile -f - MPI=1 \
        _amalgamate_print_var 2>/dev/null <<EOF
_amalgamate_print_var:
	@echo \$($1)
EOF
}
if [[ -n ${SCMOE_SRC:-} ]]; then
    core_src=$SCMOE_SRC
else
    core_src="$(make_var CORE_SRC) $(make_var BLAS_SRC)" || true
fi
if [[ -n ${SCMOE_MPI_SRC+set} ]]; then
    mpi_src=$SCMOE_MPI_SRC
else
    mpi_src=$(make_var MPI_SRC) || true
fi
read -r -a core_src <<<"$core_src"
read -r -a mpi_src <<<"$mpi_src"
((${#core_src[@]} > 0)) || die "could not read CORE_SRC/BLAS_SRC from the Makefile (set SCMOE_SRC)"
for f in "${core_src[@]}" "${mpi_src[@]}"; do [[ -f $f ]] || die "source $f not found"; done

# ---- project headers, in dependency order ----
INC_RE='^[[:space:]]*#[[:space:]]*include[[:space:]]*"([^"]+)"'
project_includes() { # FILE -> the project headers it includes, as paths from the repository root
    local line dir
    dir=$(dirname "$1")
    while IFS= read -r line; do
        if [[ $line =~ $INC_RE ]]; then
            local p
            p=$(realpath -m --relative-to=. "$dir/${BASH_REMATCH[1]}")
            [[ -f $p ]] || die "$1 includes \"${BASH_REMATCH[1]}\", which is not in the project"
            echo "$p"
        fi
    done <"$1"
}

declare -A group_of=()   # header -> public | public_mpi | core | mpi
headers=()               # every header, each after the headers it includes
group=""
visit() {
    local h=$1 dep
    [[ -n ${group_of[$h]:-} ]] && return 0
    group_of[$h]=$group
    for dep in $(project_includes "$h"); do visit "$dep"; done
    headers+=("$h")
}
for h in $PUBLIC_HEADERS; do
    group=public
    [[ " $PUBLIC_MPI_HEADERS " == *" $h "* ]] && group=public_mpi
    visit "$h"
done
group=core
for f in "${core_src[@]}"; do for h in $(project_includes "$f"); do visit "$h"; done; done
group=mpi
for f in "${mpi_src[@]}"; do for h in $(project_includes "$f"); do visit "$h"; done; done

# ---- file-scope names that clash between .c files ----
if [[ -z ${SCMOE_AMALG_NO_CTAGS:-} ]] && command -v ctags >/dev/null 2>&1 && ctags --version 2>/dev/null | grep -q Universal; then
    tags() { ctags -f - --fields=+K --kinds-C=fvtsuge --language-force=C "$1" 2>/dev/null; }
    local_names() { tags "$1" | awk -F'\t' '/\tfile:/ && $1 !~ /^__anon/ {print $1}' | sort -u; }
    global_names() { tags "$1" | awk -F'\t' '!/\tfile:/ && $1 !~ /^__anon/ {print $1}' | sort -u; }
else
    echo "amalgamate: universal-ctags not found, finding file-scope names with a regex" >&2
    local_names() {
        sed -nE -e 's/^static[^=(;]*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*[(=;[].*/\1/p' \
            -e 's/^typedef[^{;]*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*;.*/\1/p' \
            -e 's/^typedef.*\}[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*;.*/\1/p' \
            -e 's/^\}[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*;.*/\1/p' \
            -e 's/^(typedef[[:space:]]+)?(struct|union|enum)[[:space:]]+([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*\{.*/\3/p' \
            "$1" | sort -u
    }
    global_names() { # functions and variables defined at column 0 without static
        grep -vE '^(static|typedef|extern)[^A-Za-z0-9_]' "$1" |
            sed -nE 's/^[A-Za-z_][^=(;]*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*[(=[].*/\1/p' | sort -u
    }
fi
declare -A local_count=() local_in=() global_in=() all_names=()
for f in "${core_src[@]}" "${mpi_src[@]}"; do
    for n in $(local_names "$f"); do
        local_count[$n]=$((${local_count[$n]:-0} + 1))
        local_in[$n]="${local_in[$n]:-} $f"
        all_names[$n]=1
    done
    for n in $(global_names "$f"); do global_in[$n]="${global_in[$n]:-} $f"; all_names[$n]=1; done
done
declare -A rename=()     # "file name" -> new name
clash_report=""
for n in "${!local_count[@]}"; do
    # A name is a clash when two .c files keep it file-local, or one keeps it and another defines it
    # with external linkage. (A .c file completing a type a header declares is not a clash.)
    if ((local_count[$n] > 1)) || [[ -n ${global_in[$n]:-} ]]; then
        files=""
        for f in ${local_in[$n]}; do
            stem=$(basename "$f" .c)
            new=${stem}_$n
            [[ -n ${all_names[$new]:-} ]] && new=$(echo "${f%.c}" | tr '/.-' '___')_$n
            i=2
            while [[ -n ${all_names[$new]:-} ]]; do new=${stem}_${n}_$i; i=$((i + 1)); done
            all_names[$new]=1
            rename["$f $n"]=$new
            files="$files $f -> $new;"
        done
        clash_report+="$n:$files"$'\n'
    fi
done
clash_report=$(printf '%s' "$clash_report" | sort)
if [[ -n $clash_report ]]; then
    echo "amalgamate: file-scope names defined in more than one .c file (renamed per file):" >&2
    printf '%s\n' "$clash_report" | sed 's/^/  /' >&2
fi

# ---- writing ----
SYS_RE='^[[:space:]]*#[[:space:]]*include[[:space:]]*<([^>]+)>'
IF_RE='^[[:space:]]*#[[:space:]]*if'
ENDIF_RE='^[[:space:]]*#[[:space:]]*endif'
DEFINE_RE='^[[:space:]]*#[[:space:]]*define[[:space:]]+([A-Za-z_][A-Za-z0-9_]*)'

# system headers a .c file includes outside any #if (hoisted above every renaming #define)
top_system_includes() {
    local line depth=0
    while IFS= read -r line; do
        if [[ $line =~ $IF_RE ]]; then depth=$((depth + 1))
        elif [[ $line =~ $ENDIF_RE ]]; then depth=$((depth - 1))
        elif ((depth == 0)) && [[ $line =~ $SYS_RE ]]; then echo "${BASH_REMATCH[1]}"
        fi
    done <"$1"
}

# emit FILE [hoist]: the file without its project #includes (and, with hoist, without the system
# #includes outside any #if, which were written above)
emit() {
    local f=$1 hoist=${2:-} line depth=0
    printf '\n/* ======== %s ======== */\n' "$f"
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ $INC_RE ]] && continue
        if [[ $line =~ $IF_RE ]]; then depth=$((depth + 1))
        elif [[ $line =~ $ENDIF_RE ]]; then depth=$((depth - 1))
        elif [[ -n $hoist ]] && ((depth == 0)) && [[ $line =~ $SYS_RE ]]; then continue
        fi
        printf '%s\n' "$line"
    done <"$f"
}

# emit_source FILE: a .c file with its clashing names renamed and its macros #undef'd after it
emit_source() {
    local f=$1 key n
    local -a renamed=()
    for key in "${!rename[@]}"; do
        [[ ${key%% *} == "$f" ]] && renamed+=("${key#* }")
    done
    if ((${#renamed[@]})); then
        printf '\n'
        for n in $(printf '%s\n' "${renamed[@]}" | sort); do printf '#define %s %s\n' "$n" "${rename["$f $n"]}"; done
    fi
    emit "$f" hoist
    local macros
    macros=$(grep -E "$DEFINE_RE" "$f" | sed -E "s/$DEFINE_RE.*/\\1/" | sort -u || true)
    for n in $(printf '%s\n' "${renamed[@]}" $macros | sort -u); do printf '#undef %s\n' "$n"; done
}

major=$(sed -nE 's/^#define SCMOE_VERSION_MAJOR ([0-9]+).*/\1/p' scmoe.h)
minor=$(sed -nE 's/^#define SCMOE_VERSION_MINOR ([0-9]+).*/\1/p' scmoe.h)
patch=$(sed -nE 's/^#define SCMOE_VERSION_PATCH ([0-9]+).*/\1/p' scmoe.h)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain -- "${headers[@]}" "${core_src[@]}" "${mpi_src[@]}" 2>/dev/null) ]] || rev="$rev+modified"

mkdir -p "$(dirname "$OUT")"
tmp="$OUT.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
    cat <<EOF
/* scmoe_all.h: scmoe $major.$minor.$patch (source $rev) as one file.
 *
 * GENERATED by tools/amalgamate.sh from the library's sources (\`make amalgamate\`): do not edit, edit
 * the sources and regenerate.
 *
 * Use (stb style): in exactly ONE C file of the program, preferably one that holds nothing else,
 *
 *     #define SCMOE_IMPLEMENTATION
 *     #include "scmoe_all.h"
 *
 * and everywhere else just #include "scmoe_all.h" (the declarations of scmoe.h and scmoe_mpi.h).
 * Define SCMOE_NO_MPI (everywhere, e.g. -DSCMOE_NO_MPI) for a one-rank build without MPI: it
 * leaves out scmoe_mpi.h and the MPI backend, and mpi.h is not needed.
 *
 * The implementation needs C11, OpenMP and OpenBLAS, and (without SCMOE_NO_MPI) MPI:
 *     mpicc -std=c11 -O2 -fopenmp \$(pkg-config --cflags openblas) app.c \\
 *           \$(pkg-config --libs openblas) -fopenmp -lm -lpthread
 *     cc -std=c11 -O2 -fopenmp -DSCMOE_NO_MPI \$(pkg-config --cflags openblas) app.c \\
 *           \$(pkg-config --libs openblas) -fopenmp -lm -lpthread
 * bf16 GEMMs (SCMOE_PRECISION_BF16) run on rounded operands through OpenBLAS; define SCMOE_WITH_ONEDNN
 * where the implementation is compiled and add -ldnnl (Debian libdnnl-dev) for oneDNN's bf16 matmuls.
 * It uses POSIX (clock_gettime, pthreads): when SCMOE_IMPLEMENTATION is defined and no feature macro
 * is, this file defines _POSIX_C_SOURCE 200809L, which works when it is included before any system
 * header (otherwise compile with -D_POSIX_C_SOURCE=200809L or -std=gnu11).
EOF
    if [[ -n $clash_report ]]; then
        printf ' *\n * File-scope names renamed because several source files define them:\n'
        printf '%s\n' "$clash_report" | sed 's/^/ *   /'
    fi
    cat <<'EOF'
 */
#if defined(SCMOE_IMPLEMENTATION) && !defined(SCMOE_ALL_IMPLEMENTATION_DONE) && !defined(_POSIX_C_SOURCE) && \
    !defined(_XOPEN_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#ifndef SCMOE_ALL_H
#define SCMOE_ALL_H
EOF
    for h in "${headers[@]}"; do [[ ${group_of[$h]} == public ]] && emit "$h"; done
    printf '\n#ifndef SCMOE_NO_MPI\n'
    for h in "${headers[@]}"; do [[ ${group_of[$h]} == public_mpi ]] && emit "$h"; done
    printf '#endif /* SCMOE_NO_MPI */\n#endif /* SCMOE_ALL_H */\n'

    printf '\n/* ================================ implementation ================================ */\n'
    printf '#if defined(SCMOE_IMPLEMENTATION) && !defined(SCMOE_ALL_IMPLEMENTATION_DONE)\n'
    printf '#define SCMOE_ALL_IMPLEMENTATION_DONE\n\n'
    declare -A sys_seen=()
    for f in "${core_src[@]}"; do
        for s in $(top_system_includes "$f"); do
            [[ -z ${sys_seen[$s]:-} ]] && { sys_seen[$s]=1; printf '#include <%s>\n' "$s"; }
        done
    done
    mpi_sys=""
    for f in "${mpi_src[@]}"; do
        for s in $(top_system_includes "$f"); do
            [[ -z ${sys_seen[$s]:-} ]] && { sys_seen[$s]=1; mpi_sys+="#include <$s>"$'\n'; }
        done
    done
    [[ -n $mpi_sys ]] && printf '#ifndef SCMOE_NO_MPI\n%s#endif\n' "$mpi_sys"
    for h in "${headers[@]}"; do [[ ${group_of[$h]} == core ]] && emit "$h"; done
    has_mpi_headers=0
    for h in "${headers[@]}"; do [[ ${group_of[$h]} == mpi ]] && has_mpi_headers=1; done
    if ((has_mpi_headers)); then
        printf '\n#ifndef SCMOE_NO_MPI\n'
        for h in "${headers[@]}"; do [[ ${group_of[$h]} == mpi ]] && emit "$h"; done
        printf '#endif /* SCMOE_NO_MPI */\n'
    fi
    for f in "${core_src[@]}"; do emit_source "$f"; done
    if ((${#mpi_src[@]})); then
        printf '\n#ifndef SCMOE_NO_MPI\n'
        for f in "${mpi_src[@]}"; do emit_source "$f"; done
        printf '#endif /* SCMOE_NO_MPI */\n'
    fi
    printf '\n#endif /* SCMOE_IMPLEMENTATION */\n'
} >"$tmp"
mv "$tmp" "$OUT"
trap - EXIT
echo "amalgamate: wrote $OUT ($(wc -l <"$OUT") lines: ${#headers[@]} headers, $((${#core_src[@]} + ${#mpi_src[@]})) sources)" >&2
