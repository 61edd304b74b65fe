# mk/install.mk: the shared library, `make install` / `make uninstall` (with scmoe.pc and scmoe-static.pc
# for pkg-config),
# the single-file drop-in (`make amalgamate`) and the API reference (`make docs`).
#
# Included by the Makefile after it defines B, LIB_OBJ, CC_LIB, LDFLAGS, LDLIBS, MPI and BLAS_LIB.
#
#   make install   [PREFIX=/usr/local] [DESTDIR=] [LIBDIR=$(PREFIX)/lib] [INCLUDEDIR=$(PREFIX)/include]
#                  [PKGCONFIGDIR=$(LIBDIR)/pkgconfig] [LDCONFIG=ldconfig (empty: skip)]
#   make uninstall (the same variables)
#   make shared    $(B)/libscmoe.so -> libscmoe.so.MAJOR -> libscmoe.so.MAJOR.MINOR.PATCH
#   make amalgamate  dist/scmoe_all.h
#   make docs      docs/html (installs doxygen when missing; fails on any doxygen warning)

PREFIX       ?= /usr/local
DESTDIR      ?=
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL      ?= install
LDCONFIG     ?= ldconfig

# The version is the one scmoe.h declares.
scmoe_version_part = $(shell sed -n 's/^[#]define SCMOE_VERSION_$(1) *\([0-9][0-9]*\).*/\1/p' scmoe.h)
SCMOE_VERSION_MAJOR := $(call scmoe_version_part,MAJOR)
SCMOE_VERSION_MINOR := $(call scmoe_version_part,MINOR)
SCMOE_VERSION_PATCH := $(call scmoe_version_part,PATCH)
SCMOE_VERSION := $(SCMOE_VERSION_MAJOR).$(SCMOE_VERSION_MINOR).$(SCMOE_VERSION_PATCH)
SCMOE_SONAME  := libscmoe.so.$(SCMOE_VERSION_MAJOR)
SCMOE_SHLIB   := libscmoe.so.$(SCMOE_VERSION)

# scmoe_mpi.h is installed by MPI builds only (without MPI, scmoe_context_create_mpi is not in the library);
# scmoe_cuda.h and libscmoe_cuda.a by CUDA=1 builds.
SCMOE_PUBLIC_HEADERS := scmoe.h $(if $(filter 1,$(MPI)),scmoe_mpi.h) $(if $(filter 1,$(CUDA)),scmoe_cuda.h)

# ---- the shared library: the same PIC objects as libscmoe.a, exporting only scmoe_* ----
# -z defs: every symbol must resolve at link time (MPI through mpicc, OpenBLAS, libgomp through LDLIBS),
# so the library records all its dependencies (not with the sanitizers, whose runtime stays undefined).
SCMOE_SHLIB_LDFLAGS := -shared -Wl,-soname,$(SCMOE_SONAME) -Wl,--version-script=$(B)/libscmoe.map \
                       $(if $(filter 1,$(SAN)),,-Wl,-z,defs)

$(B)/libscmoe.map: mk/install.mk
	@mkdir -p $(dir $@)
	printf '{\n  global: scmoe_[!_]*;\n  local: *;\n};\n' > $@

$(B)/$(SCMOE_SHLIB): $(LIB_OBJ) $(B)/libscmoe.map
	$(CC_LIB) $(SCMOE_SHLIB_LDFLAGS) $(LDFLAGS) $(LIB_OBJ) $(LDLIBS) -o $@

$(B)/libscmoe.so: $(B)/$(SCMOE_SHLIB)
	ln -sf $(SCMOE_SHLIB) $(B)/$(SCMOE_SONAME)
	ln -sf $(SCMOE_SONAME) $@

shared: $(B)/libscmoe.so

# ---- scmoe.pc ----
# A dependency goes to Requires.private when pkg-config knows it, else its flags to Libs.private.
SCMOE_PC_MPI := $(if $(filter 1,$(MPI)),$(shell pkg-config --exists ompi-c 2>/dev/null && echo yes || echo no),none)
SCMOE_PC_BLAS := $(shell pkg-config --exists openblas 2>/dev/null && echo yes || echo no)
SCMOE_PC_REQUIRES := $(if $(filter yes,$(SCMOE_PC_MPI)),ompi-c) $(if $(filter yes,$(SCMOE_PC_BLAS)),openblas)
SCMOE_PC_LIBS := $(if $(filter no,$(SCMOE_PC_MPI)),-lmpi) $(if $(filter no,$(SCMOE_PC_BLAS)),$(BLAS_LIB)) \
                 $(DNNL_LIB) -fopenmp -lm -lpthread
# libdir and includedir relative to ${prefix} when under it, so the file can be relocated
scmoe_pc_dir = $(if $(filter $(PREFIX)/%,$(1)),$${prefix}/$(patsubst $(PREFIX)/%,%,$(1)),$(1))

$(B)/scmoe.pc: scmoe.pc.in scmoe.h mk/install.mk _scmoe_force
	@mkdir -p $(dir $@)
	sed -e 's|@prefix@|$(PREFIX)|' -e 's|@libdir@|$(call scmoe_pc_dir,$(LIBDIR))|' \
	    -e 's|@includedir@|$(call scmoe_pc_dir,$(INCLUDEDIR))|' -e 's|@version@|$(SCMOE_VERSION)|' \
	    -e 's|@requires_private@|$(strip $(SCMOE_PC_REQUIRES))|' -e 's|@libs_private@|$(strip $(SCMOE_PC_LIBS))|' \
	    scmoe.pc.in > $@

# scmoe-static.pc: the archive by its path. pkg-config --static only appends Libs.private after Libs, so
# scmoe.pc's -lscmoe still finds libscmoe.so where both sit in libdir (the linker prefers it): a
# static link names the archive itself, and its dependencies become plain Requires and Libs (the same
# flags with or without --static).
$(B)/scmoe-static.pc: $(B)/scmoe.pc
	sed -e 's|^Name: scmoe$$|Name: scmoe-static|' -e 's|^Description: |Description: (static archive) |' \
	    -e 's|^Requires.private:|Requires:|' -e 's|^Libs: .*|Libs: $${libdir}/libscmoe.a $(strip $(SCMOE_PC_LIBS))|' \
	    -e '/^Libs.private:/d' $< > $@

# ---- install / uninstall ----
install: $(B)/libscmoe.a $(B)/libscmoe.so $(B)/scmoe.pc $(B)/scmoe-static.pc $(if $(filter 1,$(CUDA)),$(B)/libscmoe_cuda.a)
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 644 $(B)/libscmoe.a $(DESTDIR)$(LIBDIR)/libscmoe.a
	$(if $(filter 1,$(CUDA)),$(INSTALL) -m 644 $(B)/libscmoe_cuda.a $(DESTDIR)$(LIBDIR)/libscmoe_cuda.a)
	$(INSTALL) -m 755 $(B)/$(SCMOE_SHLIB) $(DESTDIR)$(LIBDIR)/$(SCMOE_SHLIB)
	ln -sf $(SCMOE_SHLIB) $(DESTDIR)$(LIBDIR)/$(SCMOE_SONAME)
	ln -sf $(SCMOE_SONAME) $(DESTDIR)$(LIBDIR)/libscmoe.so
	$(INSTALL) -m 644 $(SCMOE_PUBLIC_HEADERS) $(DESTDIR)$(INCLUDEDIR)/
	$(INSTALL) -m 644 $(B)/scmoe.pc $(DESTDIR)$(PKGCONFIGDIR)/scmoe.pc
	$(INSTALL) -m 644 $(B)/scmoe-static.pc $(DESTDIR)$(PKGCONFIGDIR)/scmoe-static.pc
	@if [ -z "$(DESTDIR)" ] && [ -n "$(LDCONFIG)" ] && [ "$$(id -u)" = 0 ]; then $(LDCONFIG) 2>/dev/null || true; fi

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libscmoe.a $(DESTDIR)$(LIBDIR)/libscmoe.so $(DESTDIR)$(LIBDIR)/$(SCMOE_SONAME) \
	      $(DESTDIR)$(LIBDIR)/$(SCMOE_SHLIB) $(DESTDIR)$(INCLUDEDIR)/scmoe.h $(DESTDIR)$(INCLUDEDIR)/scmoe_mpi.h \
	      $(DESTDIR)$(LIBDIR)/libscmoe_cuda.a $(DESTDIR)$(INCLUDEDIR)/scmoe_cuda.h \
	      $(DESTDIR)$(PKGCONFIGDIR)/scmoe.pc $(DESTDIR)$(PKGCONFIGDIR)/scmoe-static.pc
	@if [ -z "$(DESTDIR)" ] && [ -n "$(LDCONFIG)" ] && [ "$$(id -u)" = 0 ]; then $(LDCONFIG) 2>/dev/null || true; fi

# ---- the single-file drop-in, generated from every source and header ----
SCMOE_AMALG_DEPS := tools/amalgamate.sh Makefile $(wildcard *.c *.h kernels/*.c kernels/*.h blas_backend/*.c \
                    blas_backend/*.h mpi_backend/*.c mpi_backend/*.h)

dist/scmoe_all.h: $(SCMOE_AMALG_DEPS)
	tools/amalgamate.sh $@

amalgamate: dist/scmoe_all.h

# ---- the API reference ----
docs:
	@command -v doxygen >/dev/null 2>&1 || tools/install_deps.sh doxygen
	@mkdir -p $(B)
	rm -rf docs/html
	SCMOE_VERSION=$(SCMOE_VERSION) doxygen Doxyfile > $(B)/doxygen.out 2> $(B)/doxygen.warnings || { cat $(B)/doxygen.warnings; exit 1; }
	@if [ -s $(B)/doxygen.warnings ]; then cat $(B)/doxygen.warnings; echo "docs: doxygen warned" >&2; exit 1; fi
	@echo "docs: docs/html/index.html"

_scmoe_force:

.PHONY: install uninstall shared amalgamate docs _scmoe_force
