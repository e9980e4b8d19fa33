# The wheelhouse as an image, so that an offline build copies it into its build stages only
# (Dockerfile's WHEELHOUSE_IMAGE). Context: build/wheelhouse (deploy/images/wheelhouse.sh).
FROM scratch
COPY . /wheels/
